"""Algorithms in pure torch: no files, no network, no environment, no logging set-up."""
