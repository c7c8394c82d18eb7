# placeholder: replaced by the CLI work
def main(argv=None):
    raise SystemExit("kquant CLI not built yet")
