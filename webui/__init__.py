"""The web pages (Gradio, Streamlit) and the HTTP client they share."""
