"""taoke (套壳): build task models on open base models, and prove what a model is built on."""

__version__ = "0.1.0"
