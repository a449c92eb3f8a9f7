"""camid: which camera model took this photo, told from the traces its imaging pipeline left in the pixels."""
__version__ = "0.1.0"
