//! Few-shot losses shared by both stages: the weighted (V-Net) dice loss and L_co.
