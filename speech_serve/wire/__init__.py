"""What devices, examples and the load tool use to talk to the service: Opus encoding, Xiaozhi
framing, device tokens, the Ray dashboard's auth. Nothing here imports the server."""
