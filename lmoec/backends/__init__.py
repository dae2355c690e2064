"""Backends: the reference oracle, and the emitters that render templates into packages."""
