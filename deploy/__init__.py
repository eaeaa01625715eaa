"""Running Quiver on more than one GPU or machine (Ray Serve: `quiver.deploy.ray_serve`, imported only when used)."""
