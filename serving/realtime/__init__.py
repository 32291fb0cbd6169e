"""`/v1/realtime`: the OpenAI Realtime protocol over a WebSocket, in small rooms.

wire.py (the audio format and the dialects' event-name table, standard library only: the pages read it
too), protocol.py (the two dialects: session settings and shapes), input.py (pcm16 24 kHz -> 16 kHz ->
speech segments), conversation.py (items), responses.py (the response lifecycle, turns taken by
`voice/turns.py`'s machine), session.py (a thin dispatcher over those, sharing context.py's `Context`;
synchronous and socket-free), jobs.py (what a session asks of the engine), transport.py (the WebSocket
route). This `__init__` imports nothing, so a page that reads wire.py loads no model code.
"""
