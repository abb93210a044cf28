"""Pancreas segmentation with the Attention U-Net (Oktay et al., MIDL 2018): data, training, evaluation."""
