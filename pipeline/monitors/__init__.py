"""Callbacks that make training visible: gradient flow, weight updates, activations, prediction images, the test report; and the plots they draw."""
