from lit_imgcls.cli import main

if __name__ == "__main__":
    main()
