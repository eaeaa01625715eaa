"""Train the six adapter kinds (and full fine-tuning, for comparison) and export them as adapter directories
that `quiver.adapters.formats` reads. The server never imports this package."""
