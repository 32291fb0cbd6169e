"""Serve the engine over HTTP and WebSocket: `python server.py --help`; the code is serving/cli.py."""
from serving.cli import main

if __name__ == "__main__":
    main()
