"""Talk to the model (microphone, speaker, camera): `python realtime_vad_player.py --help`; the code is voice/cli.py."""
from voice.cli import main

if __name__ == "__main__":
    main()
