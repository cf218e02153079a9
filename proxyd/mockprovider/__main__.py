"""`python -m proxyd.mockprovider`: run the mock provider."""

from proxyd.mockprovider.app import main

main()
