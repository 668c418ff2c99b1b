"""The Compare engine without UI: one base model with adapters attached as views (``engine``),
left-padded batched generation with streaming and stop (``generate``), generation settings and
answers without torch (``settings``), and where adapters come from (``sources``).
"""
