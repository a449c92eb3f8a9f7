"""camid: which camera model took this photo, told from the traces its imaging pipeline left in the pixels."""
import os

# Quiet TensorFlow's C++ start-up chatter for a command-line tool; a user who sets the variable wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
