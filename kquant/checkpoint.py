# placeholder: replaced by the checkpoint work
def save_quantized(model, path):
    raise NotImplementedError


def load_quantized(model, path):
    raise NotImplementedError
