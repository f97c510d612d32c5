from .dae import dae_, dae_mask, dae_sgd_step_
