"""The method core: pure tensor functions for vision-token reduction (no modules, no I/O).

- :mod:`pipeline.tokens.elip`  text-guided selection + attention-weighted fusion (ELIP)
- :mod:`pipeline.tokens.tome`  bipartite soft matching and size-weighted merging (ToMe)
- :mod:`pipeline.tokens.evit`  inattentive-token fusion (EViT)
- :mod:`pipeline.tokens.reducers`  one layer's reduction step as an object (identity when off)
- :mod:`pipeline.tokens.plan`  a reduction config -> the steps of each layer of a ViT
"""
