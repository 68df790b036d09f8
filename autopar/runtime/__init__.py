"""Tracing, autodiff, lowering and execution."""
