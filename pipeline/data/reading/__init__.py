"""Reading data sets: the layouts on disk, readers by file ending (2D images, NIfTI, DICOM series) and the data check."""
