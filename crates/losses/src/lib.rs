//! Training losses: Hungarian matching with point sampling, mask BCE/dice, weighted dice and the L_co term.

pub mod fewshot;
