"""fer-tune: find good training recipes for multi-task facial expression recognition."""

__version__ = "0.1.0"

EXPRESSIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
"""AffectNet's 8 expression classes, in AffectNet's id order."""

NUM_EXPRESSIONS = len(EXPRESSIONS)

TASKS = ("expression", "valence", "arousal")
"""The network's three heads, in the order every table, loss and metric uses."""
