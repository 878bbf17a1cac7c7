//! Mask Matching module (stage 2): self- and cross-alignment, masked-GAP prototypes, the matching MLP and the final mask.
