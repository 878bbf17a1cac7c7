//! Potential Objects Segmenter (stage 1): pixel decoder and masked-attention transformer decoder that propose N class-agnostic masks per image.
