"""Developer tools, apart from what a user runs: the tiny-checkpoint maker (make_checkpoint.py), the benchmarks
(bench_realtime.py; bench.py at the root measures the engine), the server soak test (soak.py), the voice loop's
simulation's test doubles and scenarios (voice_sim.py, voice_scenarios.py) and its report
(`python -m utils.interrupt_demo`), and reading WAV files (audio_io.py). Not part of the installed package.

Imports go one way: utils/ uses voice/, serving/ and omni/; none of them imports utils/.
"""
