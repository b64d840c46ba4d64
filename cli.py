"""placeholder"""
def main() -> None:
    print("cosa")
