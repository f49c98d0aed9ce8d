"""placeholder: being written"""
def capacity(*a, **k): raise NotImplementedError
def dispatch_plan(*a, **k): raise NotImplementedError
def permute(*a, **k): raise NotImplementedError
def unpermute(*a, **k): raise NotImplementedError
