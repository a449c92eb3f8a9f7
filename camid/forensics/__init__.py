"""Forensic building blocks shared by the stages: ImageMagick-exact JPEG quality, EXIF/XMP/IRB metadata and
edit detection, and the per-file inspection the filter stage judges by."""
