"""The Pyro and ArviZ layer: the model, the init strategy, MAP/SVI/NUTS and InferenceData."""
