"""The read path: typed queries in, typed study/image hits out; similarity maps, previews, quality."""
