"""Building blocks with no pipeline knowledge: image decoding, atomic files, metrics, manipulations, patches, plots."""
