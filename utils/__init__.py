"""Developer tools, apart from what a user runs: the tiny-checkpoint maker (make_checkpoint.py), the benchmarks
(bench_realtime.py; bench.py at the root measures the engine), the server soak test (soak.py), the voice loop's
simulation (voice_sim.py, voice_scenarios.py) and its report (`python -m utils.interrupt_demo`). Plus one edge
helper the entry points use: WAV files in and out (audio_io.py).

Imports go one way: utils/ uses voice/, serving/ and omni/; none of them imports utils/ (the entry point
realtime_vad_player.py does, for audio_io and for answering a file through the simulation).
"""
