"""Reading data sets: the layouts on disk, one reader registry by file ending (2D images, NIfTI, .mha/.nrrd via SimpleITK, DICOM series) and the data check."""
