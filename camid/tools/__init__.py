"""Commands beside the pipeline: those that write params.yaml (`camid profile`, `camid catalog from-folder`) and
those an analyst reads (`camid explain`, `camid ui`, `camid report`; the cards of the last two: `cards`)."""
