"""Reading input model folders and writing the merged one: the only modules that touch files."""
