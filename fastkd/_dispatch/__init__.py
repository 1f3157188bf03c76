"""Between the public functions and the backends: the tensors checked, the spec built once, the
executor picked (one process, or the vocabulary split over a group), the autograd Functions and the
torch.compile custom op."""
