from accounts.services import account_for_user

CURRENT_ACCOUNT_SESSION_KEY = "current_account_id"


def current_account(request) -> dict:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    account = account_for_user(
        user=user, account_id=request.session.get(CURRENT_ACCOUNT_SESSION_KEY)
    )
    return {"current_account": account}
