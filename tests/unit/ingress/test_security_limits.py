from speech_serve.ingress.security import TokenBucket


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_sustained_rate():
    clock = Clock()
    bucket = TokenBucket(rate_per_s=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.15  # one and a half tokens back
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.now += 60  # an idle minute refills to the burst, not past it
    assert sum(bucket.take() for _ in range(20)) == 5


def test_token_bucket_never_refuses_a_client_under_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate_per_s=10, burst=1, clock=clock)
    taken = []
    for _ in range(100):
        clock.now += 0.11
        taken.append(bucket.take())
    assert all(taken)
