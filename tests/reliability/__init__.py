"""Reliability suite: randomised state machine, faults, crashes, stress and hostile input."""
