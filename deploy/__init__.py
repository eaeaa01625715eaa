"""Running Quiver on more than one GPU or machine (Ray Serve: `deploy.ray_serve`, imported only when used)."""
