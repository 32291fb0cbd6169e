"""The turn-taking core, shared by the desktop voice loop and the Realtime server (`serving/realtime/`).

Device-free: the Silero VAD segmenter (vad.py), the echo guard (echo.py), the one turn state machine
(turns.py), the signal helpers with the one pcm <-> float pair (signal.py), and the desktop loop over
source/sink interfaces (loop.py, responder.py, ports.py). The device adapters (devices.py, camera.py) sit
beside it, and so does the replay that drives the loop on a virtual clock (replay.py: `--input-file`, the
tests); the commands' flags are cli.py.
"""
