"""In-training and post-hoc defenses against emergent misalignment."""
