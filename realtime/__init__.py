"""The realtime voice loop: device-free turn logic (VAD, echo guard, state machine) over source/sink interfaces."""
