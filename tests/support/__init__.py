"""What tests share: fixture data (audio.py), fakes of what the code talks to (fakes.py), and the
helpers of the integration tests' real service (service.py, looping.py). Test modules import from
here, never from one another."""
