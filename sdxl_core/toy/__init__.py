"""A trained toy SDXL world: procedural captioned scenes (:mod:`.world`) and an exact image-analysis oracle (:mod:`.oracle`)."""
