"""kvrouter's worker process: owns the model through MLX and serves it over gRPC."""
