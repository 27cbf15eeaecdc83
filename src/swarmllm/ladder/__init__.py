"""Ladder Residual blocks (each sub-layer reads the residual stream one sub-layer late, so a server can overlap
tensor-parallel communication with compute). Reserved for that issue; nothing here yet."""
