"""Running servers locally: Triton (`launcher`, `backends`, `serve_command`), its admin key and TLS (`doors`), and a
loopback redis-server for the shared cache tier (`local_redis`)."""
