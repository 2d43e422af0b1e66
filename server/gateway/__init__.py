"""The DICOM e-mail gateway of the DRG network (DESIGN.md sections 3 and 4): transfer jobs, keys, directory."""
