"""Reading and writing volumes, label maps, Slicer segmentations and Slicer markups."""
