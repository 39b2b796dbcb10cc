"""Module layer: MarkovRefine, the refinement loop it drives sync and async, its signatures and saved state."""
