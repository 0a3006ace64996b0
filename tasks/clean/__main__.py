from tasks.clean.stage import main

if __name__ == "__main__":
    main()
